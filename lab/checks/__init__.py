"""What runs inside the lab's dom0: dom0.sh (shell steps) and the Python
check modules (``python -m lab.checks.<name>``), each printing result lines."""
