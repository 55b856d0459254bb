"""Text environments behind one scalar API (a3t.envs.base.TextEnv)."""
