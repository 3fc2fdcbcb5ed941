"""What every part runs on: the process group and the cluster's placement (dist, cluster), the
stalled-rank heartbeat (stall), exit statuses (errors), durable files, logging and pictures,
device precision, memory budgets and the typed-config machinery. Imports nothing above it."""
