"""How services and workers start: scripts run by path (`python infra/stack.py up`), which
import each other as `infra.*`. Never imported by the project's code."""
