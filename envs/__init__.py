"""Environments: the torch-native image-classification MDP (``envs.image_mdp``) and its datasets.

Importing this package is cheap: it only registers the gymnasium id
``plasticity/ImageMDP-v0`` (a lazy entry point; nothing is loaded until ``gym.make``):

    import gymnasium as gym, envs
    env = gym.make("plasticity/ImageMDP-v0", dataset="mnist", data_dir="path/to/mnist")
"""

from gymnasium.envs.registration import register, registry

IMAGE_MDP_ID = "plasticity/ImageMDP-v0"

if IMAGE_MDP_ID not in registry:
    register(id=IMAGE_MDP_ID, entry_point="envs.image_mdp:ImageMDPEnv")
