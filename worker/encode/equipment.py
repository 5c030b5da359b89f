"""Equipment — how every Lung Vision output names its maker (Manufacturer, software, contributing equipment)."""

from dataclasses import dataclass

import highdicom as hd
from pydicom.sr.codedict import codes

from common.identity import MANUFACTURER
from common.version import __version__


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a result: name, version and weights hash (from the model card)."""

    name: str
    version: str
    weights_sha256: str

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020): the product, then the model."""
        return [f"lungvision {__version__}", f"{self.name} {self.version}"]

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment Sequence item naming Lung Vision as processing equipment."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.software_versions,
            contribution_description="Pneumonia probability and Grad-CAM heatmap",
        )
