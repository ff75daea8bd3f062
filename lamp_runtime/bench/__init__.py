"""`lamp bench`: side-by-side measurements of what pooled prompts, mixed-task batching and the
prompt cache save, on the same `Engine` the server runs. Every bench interleaves the variants it
compares, repeats them, and reports medians with their spread; none of it is a pass/fail test.
"""
