"""`python -m pipeline.openai ...`: the OpenAI arm's command line (see stage.py)."""

from pipeline.openai.stage import main

if __name__ == "__main__":
    main()
