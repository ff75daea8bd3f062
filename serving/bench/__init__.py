"""Benches of the serving layer (`lamp bench registry`); the engine benches live in lamp_runtime/bench."""
