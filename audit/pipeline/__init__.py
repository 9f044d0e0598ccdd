"""The Ray Data job behind `audit run`: manifest -> decode -> explain actors -> Parquet, resumable."""
