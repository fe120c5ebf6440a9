"""Base revision: the version-1 schema as it was when Alembic took over (docs/database.md#schema-migrations).

Databases made before that (they have ``schema_info.schema_version = 1`` but no
``alembic_version``) are stamped at this revision by :func:`modules.SQLModule.schema.ensure_schema`;
new databases are created from the models and stamped at the head revision. Upgrading an empty
database from nothing runs :func:`upgrade` and gives the same schema.

Revision ID: 0001
Revises:
Create Date: 2026-12-06 11:14:09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibration_model_fit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("feed", sa.SmallInteger(), nullable=False),
        sa.Column("band", sa.SmallInteger(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("model_type", sa.String(length=16), nullable=False),
        sa.Column("poly_coeffs", sa.JSON(), nullable=True),
        sa.Column("mjd_ref", sa.Float(), nullable=False),
        sa.Column("nearest_mjds", sa.JSON(), nullable=True),
        sa.Column("nearest_gains", sa.JSON(), nullable=True),
        sa.Column("fit_rms", sa.Float(), nullable=True),
        sa.Column("n_observations", sa.Integer(), nullable=True),
        sa.Column("mjd_min", sa.Float(), nullable=True),
        sa.Column("mjd_max", sa.Float(), nullable=True),
        sa.Column("updated_utc", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_model_fit")),
        sa.UniqueConstraint(
            "source",
            "feed",
            "band",
            "channel",
            name=op.f("uq_calibration_model_fit_source_feed_band_channel"),
        ),
    )
    op.create_table(
        "comap_data",
        sa.Column("obsid", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("level1_path", sa.String(length=1024), nullable=True),
        sa.Column("level2_path", sa.String(length=1024), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("source_group", sa.String(length=32), nullable=True),
        sa.Column("utc_start", sa.String(length=19), nullable=True),
        sa.Column("mjd_start", sa.Float(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("telescope", sa.String(length=128), nullable=True),
        sa.Column("instrument", sa.String(length=128), nullable=True),
        sa.Column("platform", sa.String(length=128), nullable=True),
        sa.Column("pixels", sa.String(length=128), nullable=True),
        sa.Column("version", sa.String(length=128), nullable=True),
        sa.Column("bof", sa.String(length=128), nullable=True),
        sa.Column("bw", sa.Float(), nullable=True),
        sa.Column("tsamp", sa.Float(), nullable=True),
        sa.Column("coeff_iq", sa.Integer(), nullable=True),
        sa.Column("features", sa.Integer(), nullable=True),
        sa.Column("fft_shift", sa.Integer(), nullable=True),
        sa.Column("iqcalid", sa.Integer(), nullable=True),
        sa.Column("level", sa.Integer(), nullable=True),
        sa.Column("nbit", sa.Integer(), nullable=True),
        sa.Column("nchan", sa.Integer(), nullable=True),
        sa.Column("nint", sa.Integer(), nullable=True),
        sa.Column("n_feeds", sa.Integer(), nullable=True),
        sa.Column("level1_size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("registered_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_utc", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("obsid", name=op.f("pk_comap_data")),
    )
    with op.batch_alter_table("comap_data", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_comap_data_mjd_start"), ["mjd_start"], unique=False)
        batch_op.create_index(batch_op.f("ix_comap_data_source"), ["source"], unique=False)
        batch_op.create_index(batch_op.f("ix_comap_data_source_group"), ["source_group"], unique=False)

    op.create_table(
        "processing_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("obsid", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_module", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("code_version", sa.String(length=128), nullable=True),
        sa.Column("config_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_utc", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed')", name=op.f("ck_processing_jobs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processing_jobs")),
        sa.UniqueConstraint("obsid", "stage", name=op.f("uq_processing_jobs_obsid_stage")),
    )
    with op.batch_alter_table("processing_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_processing_jobs_obsid"), ["obsid"], unique=False)
        batch_op.create_index("ix_processing_jobs_stage_status", ["stage", "status"], unique=False)

    schema_info = op.create_table(
        "schema_info",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_schema_info")),
    )
    op.bulk_insert(schema_info, [{"key": "schema_version", "value": "1"}])
    op.create_table(
        "calibration_flux",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("obsid", sa.Integer(), nullable=False),
        sa.Column("feed", sa.SmallInteger(), nullable=False),
        sa.Column("band", sa.SmallInteger(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("mjd", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=True),
        sa.Column("frequency_ghz", sa.Float(), nullable=True),
        sa.Column("measured_flux", sa.Float(), nullable=True),
        sa.Column("flux_error", sa.Float(), nullable=True),
        sa.Column("amplitude", sa.Float(), nullable=True),
        sa.Column("amplitude_error", sa.Float(), nullable=True),
        sa.Column("chi2", sa.Float(), nullable=True),
        sa.Column("x_offset_deg", sa.Float(), nullable=True),
        sa.Column("y_offset_deg", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["obsid"],
            ["comap_data.obsid"],
            name=op.f("fk_calibration_flux_obsid_comap_data"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_flux")),
        sa.UniqueConstraint(
            "obsid", "feed", "band", "channel", name=op.f("uq_calibration_flux_obsid_feed_band_channel")
        ),
    )
    with op.batch_alter_table("calibration_flux", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_calibration_flux_obsid"), ["obsid"], unique=False)

    op.create_table(
        "observation_summary",
        sa.Column("obsid", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("processing_status", sa.String(length=16), nullable=True),
        sa.Column("processing_error", sa.Text(), nullable=True),
        sa.Column("median_tsys", sa.Float(), nullable=True),
        sa.Column("mean_tau", sa.Float(), nullable=True),
        sa.Column("calibrator_flux", sa.Float(), nullable=True),
        sa.Column("calibrator_flux_error", sa.Float(), nullable=True),
        sa.Column("calibrator_chi2", sa.Float(), nullable=True),
        sa.Column("pointing_offset_az", sa.Float(), nullable=True),
        sa.Column("pointing_offset_el", sa.Float(), nullable=True),
        sa.Column("pointing_offset_ra", sa.Float(), nullable=True),
        sa.Column("pointing_offset_dec", sa.Float(), nullable=True),
        sa.Column("n_scans", sa.Integer(), nullable=True),
        sa.Column("level2_created_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_utc", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["obsid"],
            ["comap_data.obsid"],
            name=op.f("fk_observation_summary_obsid_comap_data"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("obsid", name=op.f("pk_observation_summary")),
    )
    op.create_table(
        "quality_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("obsid", sa.Integer(), nullable=False),
        sa.Column("feed", sa.SmallInteger(), nullable=False),
        sa.Column("band", sa.SmallInteger(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("observer_ok", sa.Boolean(), nullable=False),
        sa.Column("pipeline_ok", sa.Boolean(), nullable=False),
        sa.Column("is_good", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("filtered_white_noise", sa.Float(), nullable=True),
        sa.Column("filtered_red_noise", sa.Float(), nullable=True),
        sa.Column("filtered_noise_index", sa.Float(), nullable=True),
        sa.Column("filtered_auto_rms", sa.Float(), nullable=True),
        sa.Column("filtered_fknee", sa.Float(), nullable=True),
        sa.Column("unfiltered_white_noise", sa.Float(), nullable=True),
        sa.Column("unfiltered_red_noise", sa.Float(), nullable=True),
        sa.Column("unfiltered_noise_index", sa.Float(), nullable=True),
        sa.Column("unfiltered_auto_rms", sa.Float(), nullable=True),
        sa.Column("unfiltered_fknee", sa.Float(), nullable=True),
        sa.Column("n_spikes", sa.Integer(), nullable=True),
        sa.Column("n_nan_values", sa.Integer(), nullable=True),
        sa.Column("mean_atm_temp", sa.Float(), nullable=True),
        sa.Column("updated_utc", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("band >= 0", name=op.f("ck_quality_flags_band_min")),
        sa.CheckConstraint("channel >= 0", name=op.f("ck_quality_flags_channel_min")),
        sa.CheckConstraint("feed >= 1", name=op.f("ck_quality_flags_feed_min")),
        sa.ForeignKeyConstraint(
            ["obsid"],
            ["comap_data.obsid"],
            name=op.f("fk_quality_flags_obsid_comap_data"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quality_flags")),
        sa.UniqueConstraint(
            "obsid", "feed", "band", "channel", name=op.f("uq_quality_flags_obsid_feed_band_channel")
        ),
    )
    with op.batch_alter_table("quality_flags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_quality_flags_obsid"), ["obsid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("quality_flags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quality_flags_obsid"))

    op.drop_table("quality_flags")
    op.drop_table("observation_summary")
    with op.batch_alter_table("calibration_flux", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calibration_flux_obsid"))

    op.drop_table("calibration_flux")
    op.drop_table("schema_info")
    with op.batch_alter_table("processing_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_processing_jobs_stage_status")
        batch_op.drop_index(batch_op.f("ix_processing_jobs_obsid"))

    op.drop_table("processing_jobs")
    with op.batch_alter_table("comap_data", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_comap_data_source_group"))
        batch_op.drop_index(batch_op.f("ix_comap_data_source"))
        batch_op.drop_index(batch_op.f("ix_comap_data_mjd_start"))

    op.drop_table("comap_data")
    op.drop_table("calibration_model_fit")
