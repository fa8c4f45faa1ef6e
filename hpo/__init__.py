"""The search service: study specs, storage, objective, dispatcher, export. Knows maskcls only
through TrainConfig and fit()."""
