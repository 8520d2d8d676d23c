"""What an institution runs in federated rounds (Flower ClientApp); not yet implemented."""

__all__: list[str] = []
