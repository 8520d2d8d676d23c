"""What an institution runs in federated rounds (Flower ClientApp); not built yet."""

__all__: list[str] = []
