"""The CIFAR-100 benchmark: one config module per teacher-student pair."""
