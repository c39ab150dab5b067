"""The reference PPO agent and its gymnasium environments."""
