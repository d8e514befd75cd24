"""The coordinator's routes, one APIRouter per area: workers (signed), ledger views, OpenAI-style inference.
Each route parses, calls one service (farworker/coordinator/services/) and answers; state comes through
the dependencies in routers/deps.py."""
