"""quart_events: Server-Sent Events streams of RabbitMQ topic exchanges."""

from .app import create_app
from .settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
