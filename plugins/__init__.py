"""SubFit's built-in components (installed as ``subfit_plugins``), registered through the same
``subfit`` entry-point group as any third-party plugin: see ``builtin.py``."""
