"""The user-facing commands (``tfcompile compile|export|bench|embed|generate|demo``).

They drive the compiler; no pass imports them.
"""
