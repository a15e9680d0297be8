"""The gym: medical VQA tasks, image tools, the action protocol, scoring, rewards, and a Gymnasium Env."""

import gymnasium

from .config import EnvConfig
from .datasets import DatasetError, load_tasks
from .episode import Episode, Observation
from .gym_env import MedVistaEnv
from .images import ImageDecodeError, ImageStore, SourceImage, decode_image
from .protocol import Action, ToolCall, parse_action
from .reward import RewardConfig, RewardParts, compute_reward
from .scoring import score
from .task import AnswerType, ImageRef, Region, Task
from .tools import tool_schemas
from .views import View, render_views

__all__ = [
    "Action", "AnswerType", "DatasetError", "EnvConfig", "Episode", "ImageDecodeError", "ImageRef", "ImageStore",
    "MedVistaEnv", "Observation", "Region", "RewardConfig", "RewardParts", "SourceImage", "Task", "ToolCall", "View",
    "compute_reward", "decode_image", "load_tasks", "parse_action", "render_views", "score", "tool_schemas",
]

if "MedVista-v0" not in gymnasium.registry:
    gymnasium.register(id="MedVista-v0", entry_point="medvistagym.env.gym_env:MedVistaEnv")
