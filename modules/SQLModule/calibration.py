"""Calibration writes of the database facade (docs/database.md, docs/database.md#api): calibrator fluxes per
observation and calibration-factor models per source."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from modules.SQLModule.deferred import DeferredWrites, write_op
from modules.SQLModule.models import (
    CALIBRATION_FLUX_FIELDS,
    CALIBRATION_MODEL_FIELDS,
    MODEL_TYPES,
    CalibrationFlux,
    CalibrationModelFit,
)
from modules.SQLModule.values import _clean, _element, _int, utcnow


class CalibrationWrites(DeferredWrites):
    """Write methods on ``calibration_flux`` and ``calibration_model_fit`` rows."""

    @staticmethod
    def _flux_rows(obsid: int, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            if "obsid" in row and _int(row.pop("obsid"), "obsid") != obsid:
                raise ValueError(f"replace_calibration_flux: row for another obsid in the rows of {obsid}")
            bad = sorted(set(row) - CALIBRATION_FLUX_FIELDS)
            if bad:
                raise ValueError(f"replace_calibration_flux: unknown column(s) {bad}")
            key = _element(obsid, row.get("feed"), row.get("band"), row.get("channel"))
            row.update(feed=key[1], band=key[2], channel=key[3])
            out.append({k: _clean(v) for k, v in row.items()})
        return out

    def replace_calibration_flux(self, obsid: int, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Replace every ``calibration_flux`` row of ``obsid`` with ``rows`` (one transaction).

        Parameters
        ----------
        obsid : int
            A registered observation.
        rows : iterable of mapping
            Successful fits, each with ``feed, band, channel`` and the columns of
            docs/database.md#calibration_flux (``mjd, source, frequency_ghz, measured_flux, flux_error,
            amplitude, amplitude_error, chi2, x_offset_deg, y_offset_deg``).

        Returns
        -------
        int or None
            Number of rows inserted (None in deferred mode).
        """
        obsid = _int(obsid, "obsid")
        return self._write(self._replace_calibration_flux_impl, obsid, self._flux_rows(obsid, rows))

    @write_op("replace_calibration_flux")
    def _replace_calibration_flux_impl(
        self, s: Session, obsid: int, rows: Iterable[Mapping[str, Any]]
    ) -> int:
        obsid = _int(obsid, "obsid")
        rows = self._flux_rows(obsid, rows)
        self._require_observation(s, obsid, "replace_calibration_flux")
        s.execute(delete(CalibrationFlux).where(CalibrationFlux.obsid == obsid))
        s.add_all(CalibrationFlux(obsid=obsid, **row) for row in rows)
        return len(rows)

    @staticmethod
    def _model_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            bad = sorted(set(row) - CALIBRATION_MODEL_FIELDS)
            if bad:
                raise ValueError(f"upsert_calibration_model: unknown column(s) {bad}")
            if not row.get("source"):
                raise ValueError("upsert_calibration_model: row has no source")
            key = _element(0, row.get("feed"), row.get("band"), row.get("channel"))
            row.update(feed=key[1], band=key[2], channel=key[3], source=str(row["source"]))
            model_type = row.get("model_type", "polynomial")
            if model_type not in MODEL_TYPES:
                raise ValueError(f"upsert_calibration_model: model_type {model_type!r} not in {MODEL_TYPES}")
            out.append({k: _clean(v) for k, v in row.items()})
        return out

    def upsert_calibration_model(self, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Insert or update ``calibration_model_fit`` rows keyed by (source, feed, band, channel).

        Parameters
        ----------
        rows : iterable of mapping
            Columns of docs/database.md#calibration_model_fit; ``poly_coeffs``, ``nearest_mjds`` and
            ``nearest_gains`` may be lists or arrays.

        Returns
        -------
        int or None
            Number of rows written (None in deferred mode).
        """
        return self._write(self._upsert_calibration_model_impl, self._model_rows(rows))

    @write_op("upsert_calibration_model")
    def _upsert_calibration_model_impl(self, s: Session, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = self._model_rows(rows)
        now = utcnow()
        for row in rows:
            model = s.scalar(
                select(CalibrationModelFit).where(
                    CalibrationModelFit.source == row["source"],
                    CalibrationModelFit.feed == row["feed"],
                    CalibrationModelFit.band == row["band"],
                    CalibrationModelFit.channel == row["channel"],
                )
            )
            if model is None:
                model = CalibrationModelFit(**row)
                s.add(model)
            else:
                for key, value in row.items():
                    setattr(model, key, value)
            model.updated_utc = now
            s.flush()
        return len(rows)
