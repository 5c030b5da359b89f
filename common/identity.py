"""Our own identity: the UID root and Manufacturer that mark objects Lung Vision created (loop prevention)."""

# Placeholder root (not registered to this project): replace with a registered root before deployment.
# The worker mints every UID of its results under it, and the node never queues objects carrying it.
UID_ROOT = "1.2.826.0.1.3680043.10.1514."
MANUFACTURER = "Lung Vision"


def is_lung_vision_object(*, sop_instance_uid: str, series_instance_uid: str, manufacturer: object) -> bool:
    """True when the object was created by Lung Vision: our UID root on the instance or series, or our
    Manufacturer (whatever a source put there: None, text, or several values)."""
    return (
        sop_instance_uid.startswith(UID_ROOT)
        or series_instance_uid.startswith(UID_ROOT)
        or str(manufacturer or "").strip() == MANUFACTURER
    )
