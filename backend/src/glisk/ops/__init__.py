"""The operator's tools: ``glisk status``, ``glisk tokens retry|show`` and the metrics."""
