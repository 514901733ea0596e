"""The edge: the only code that speaks a device or market protocol.

A gateway turns what a device says into commands with deterministic ids and hands
them to a `CommandSink`; it turns setpoint decisions into device calls.
"""
