"""and_dist, a distributed trainer for AND (Huang et al., ICML 2019): the entry points (train,
evaluate, probe, export, prepare) and the config here, what they run on in the subpackages."""
