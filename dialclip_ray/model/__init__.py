"""The model core: DialCLIP over a frozen open_clip CLIP.

``backbone`` loads open_clip; ``towers`` replays its encoders block by block so
``prompts`` (domain prompts) and ``cpg`` (context prompts) can be injected;
``experts`` are the projection experts; ``dialclip`` assembles them; ``config``
is the one validated config; ``checkpoint`` and ``params`` save and account for
the trainable state; ``text`` and ``batch`` define what the data layer feeds in.
Nothing here imports Ray.
"""
