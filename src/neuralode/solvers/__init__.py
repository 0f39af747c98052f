"""Steppers: one generic explicit Runge-Kutta stepper, and the Adams multistep family."""
