"""Every event module, imported so that every stored event type has its class.

Readers of the log (hosts, projections, the verifier's callers) may meet any event
type; `events.base.event_class` imports this module the first time it meets a type
it does not know yet.
"""

from events import charger, dispatch, inverter, market, telemetry, vehicle

__all__ = ["charger", "dispatch", "inverter", "market", "telemetry", "vehicle"]
