"""The test kit: what several test modules (and bench/) share — data, DICOM fixtures, real peer processes,
and :func:`tests.kit.wait.wait_until`. Test modules import helpers from here, never from each other."""
