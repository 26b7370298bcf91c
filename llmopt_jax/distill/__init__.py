"""Knowledge distillation: losses, schedules and the student wrapper."""
