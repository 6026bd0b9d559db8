"""The built-in test-time methods, one module each; :func:`promptkd.tta.base.get_tta_method` imports them by name
(``BUILTIN_TTA_METHODS``) and each registers itself."""
