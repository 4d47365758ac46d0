"""Names shared by the asset modules: groups, the training pool, list lengths."""

DATA_GROUP = "data"
RETRIEVAL_GROUP = "retrieval"
RANKING_GROUP = "ranking"
EVALUATION_GROUP = "evaluation"
SERVING_GROUP = "serving"

# At most one training asset runs at a time (the instance's pool limit, see automation.write_dagster_yaml).
TRAINING_POOL = "training"

# Length of the served list and of the list metrics the gates compare (HR@10 / NDCG@10).
TOP_K = 10
