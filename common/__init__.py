"""Common — what the node, worker and web share: queue messages, spool, UIDs, SCU, audit, logs."""
