"""The engine contract and what every engine shares; no engine lives here.

- base.py: the contract (`Engine`: submit / abort / healthy / stats / discard / shutdown /
  observe), `EngineConfig`, `EngineStats`, `StepStats`, `EngineObserver`, `BackboneInfo`
- streams.py: the one async adapter over `submit`: `generate`, `complete`, `complete_all`
- step_loop.py: `StepLoopEngine`, the contract over a synchronous step core on a loop thread
- admission.py: the checks every engine applies to a request before queueing it
- fair_queue.py: `FairQueue`, the waiting queue of every step core: admission by a virtual token
  counter per task, a task's share of a full queue (429 beyond it), per-task counts for stats
- request_state.py (`RequestState`: per-request state, stop strings, streaming), sampling.py,
  logprobs.py, chat.py, resident.py (adapter factors loaded on demand)

The engines are packages of their own (lamp_runtime/hf/, lamp_runtime/vllm/, lamp_runtime/llamacpp/), built by
lamp_runtime/engines/; they import this package and never each other.
"""
