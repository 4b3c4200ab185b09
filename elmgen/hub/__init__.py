"""Other projects' released checkpoints as elmgen run folders: safe reading, key maps, hub loading."""

from elmgen.hub.files import read_state_dict
from elmgen.hub.gpt import elm_gpt, llamagen_gpt
from elmgen.hub.pretrained import from_pretrained, load_generator, local_folder, save_pretrained
from elmgen.hub.runs import SOURCES, import_checkpoint
