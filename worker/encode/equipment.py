"""Equipment — how every Lung Vision output names its maker (Manufacturer, software, contributing equipment)."""

import functools
from dataclasses import dataclass

import highdicom as hd
import highdicom.base_content
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


# highdicom names the source's acquisition equipment among the Contributing Equipment of each SC and SR
# (``ContributingEquipment.for_image_acquisition``), after asking whether the source's SOP class is an image:
# a scan of the standard's module tables, ≈ 1.4 ms, twice a study — a tenth of the SR's build. The answer
# depends on the SOP class alone, so it is remembered (a handful of classes; the same answers).
highdicom.base_content.does_iod_have_pixel_data = functools.cache(highdicom.base_content.does_iod_have_pixel_data)
