"""Flow-matching training, framework-free: schedules, optimizer rules, divergence guard, metrics, evaluation."""
