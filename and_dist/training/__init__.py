"""AND's training procedure on the shared loop: rounds of epochs, when to discover, evaluate and
checkpoint (trainer), its own checkpointed state (state), and what it shows a person (report)."""
