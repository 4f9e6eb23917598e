"""One converter per backend, each an exhaustive ``match`` over :data:`tracklog.values.LogValue`.

Adding a value kind makes ``mypy --strict`` point at every converter (the
``assert_never`` arm) that does not handle it yet.
"""
