"""Evaluation shared by the features: scoring the texts of preference data and the ranking
metrics on those scores (:mod:`.scores`)."""
