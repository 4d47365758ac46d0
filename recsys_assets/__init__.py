"""recsys_assets: a two-stage recommender as a Dagster asset graph."""
