from modules.DataAcquisition.DataAssess.DataAssess import DataAssess

__all__ = ["DataAssess"]
