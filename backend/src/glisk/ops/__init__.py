"""What the operator's commands do: ``glisk status``, ``glisk tokens retry|show``, ``glisk demo``
(their statements in ``queries.py``), and a worker's metrics. The commands are ``glisk.cli``'s."""
