"""Training and evaluating soft prompts (LAMP and plain prompt tuning) on the frozen backbone."""
