"""Task families. Each has ``sample(num_tasks, *, generator) -> TaskBatch``, a ``loss``
name, and ``make_model(generator)`` building the network the paper uses for it."""
