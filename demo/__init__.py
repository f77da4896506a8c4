"""The demo's stand-ins for parts of the paper's setup that a CPU cannot run: the exact arithmetic critic (for
QwQ-32B) and its token marks. The demo's problems (data.arithmetic_problems) and its preset (config.PRESETS) use the
same loop as the paper's run."""
