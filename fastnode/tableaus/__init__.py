"""One module per Runge-Kutta method; each defines ``TABLEAU`` (see ``fastnode._tableau``)."""
