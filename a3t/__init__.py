"""a3t: a ReAct agent that improves itself from its own trajectories (A3T, "ReAct Meets ActRe")."""

__version__ = "0.1.0"
