"""The booster members: LightGBM, XGBoost, CatBoost on tabular features."""
