from modules.ProcessLevel2.AtmosphereInObservation.AtmosphereInObservation import AtmosphereInObservation

__all__ = ["AtmosphereInObservation"]
