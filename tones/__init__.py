"""Style metrics of your own, for params `tone.gate` / `tone.on_style` (docs/your-own-tone.md).

A metric is a function `f(text: str) -> float` in a module of this package, named in params as
`tones.<module>:<function>`. dvc.yaml lists this folder as a dependency of every stage that
scores style, so editing a metric re-runs them.
"""
