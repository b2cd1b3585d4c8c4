"""What a trial is: data, model, search space, the reference training loop, its objectives."""
