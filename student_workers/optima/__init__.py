"""OPTIMA (docs/methods.md#optima): the module bandit, its arms and rewards, how a training run
plans, measures and logs its rounds, and the plot of a run's rounds."""
