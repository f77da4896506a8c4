"""The demo's stand-ins for parts of the paper's setup that a CPU cannot run: chained integer arithmetic problems
(arithmetic.py, for OpenMathReasoning) and the exact arithmetic critic with its token marks (exact_critic.py, for
QwQ-32B). The demo's preset (config.PRESETS["demo"]) runs them through the same loop as the paper's run."""
