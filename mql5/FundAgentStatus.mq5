//+------------------------------------------------------------------+
//| FundAgentStatus.mq5                                              |
//| The optional status reporter of fund-agent. It MOVES NO MONEY:   |
//| every few seconds it writes the account's state to               |
//|   <Common>\Files\fund-agent\status-<login>.json                  |
//| (CONTRACT.md section 5), replacing the file atomically, and can  |
//| POST the same JSON to fund-agent's local HTTP intake.            |
//+------------------------------------------------------------------+
#property copyright "fund-agent"
#property version   "1.00"
#property description "Writes account status for fund-agent. Moves no money."

input int    InpIntervalSeconds = 5;            // seconds between status writes
input string InpFolder          = "fund-agent"; // folder under Common\Files
input string InpPostUrl         = "";           // e.g. http://127.0.0.1:8787/status (empty: no POST)
input string InpSecret          = "";           // the X-Fund-Agent-Secret the agent expects

//+------------------------------------------------------------------+
//| JSON string escaping: quote, backslash and control characters.   |
//+------------------------------------------------------------------+
string JsonEscape(const string text)
  {
   string out = "";
   int n = StringLen(text);
   for(int i = 0; i < n; i++)
     {
      ushort c = StringGetCharacter(text, i);
      if(c == '"')
         out += "\\\"";
      else if(c == '\\')
         out += "\\\\";
      else if(c == '\n')
         out += "\\n";
      else if(c == '\r')
         out += "\\r";
      else if(c == '\t')
         out += "\\t";
      else if(c < 0x20)
         out += StringFormat("\\u%04x", c);
      else
         out += ShortToString(c);
     }
   return out;
  }

//+------------------------------------------------------------------+
//| The status document. Numbers use the account's currency digits.  |
//+------------------------------------------------------------------+
string StatusJson(const bool connected)
  {
   long   login  = AccountInfoInteger(ACCOUNT_LOGIN);
   int    digits = (int)AccountInfoInteger(ACCOUNT_CURRENCY_DIGITS);
   string json = "{";
   json += "\"schema\":1,";
   json += "\"login\":" + IntegerToString(login) + ",";
   json += "\"server\":\"" + JsonEscape(AccountInfoString(ACCOUNT_SERVER)) + "\",";
   json += "\"currency\":\"" + JsonEscape(AccountInfoString(ACCOUNT_CURRENCY)) + "\",";
   json += "\"balance\":" + DoubleToString(AccountInfoDouble(ACCOUNT_BALANCE), digits) + ",";
   json += "\"equity\":" + DoubleToString(AccountInfoDouble(ACCOUNT_EQUITY), digits) + ",";
   json += "\"margin\":" + DoubleToString(AccountInfoDouble(ACCOUNT_MARGIN), digits) + ",";
   json += "\"margin_free\":" + DoubleToString(AccountInfoDouble(ACCOUNT_MARGIN_FREE), digits) + ",";
   // As in MT5, the margin level is 0 when no margin is in use: that means "no margin", not 0 %.
   json += "\"margin_level\":" + DoubleToString(AccountInfoDouble(ACCOUNT_MARGIN_LEVEL), 2) + ",";
   json += "\"positions\":" + IntegerToString(PositionsTotal()) + ",";
   json += "\"connected\":" + (connected ? "true" : "false") + ",";
   json += "\"time\":" + IntegerToString((long)TimeGMT());
   json += "}";
   return json;
  }

//+------------------------------------------------------------------+
//| Write through a temporary file, then move it over the old one,   |
//| so that the agent never reads a half-written file.               |
//+------------------------------------------------------------------+
bool WriteStatus(const string json)
  {
   string name  = InpFolder + "\\status-" + IntegerToString(AccountInfoInteger(ACCOUNT_LOGIN)) + ".json";
   string tmp   = name + ".tmp";
   uchar  bytes[];
   int    count = StringToCharArray(json, bytes, 0, WHOLE_ARRAY, CP_UTF8) - 1; // drop the terminating 0
   if(count <= 0)
      return false;
   int handle = FileOpen(tmp, FILE_WRITE | FILE_BIN | FILE_COMMON);
   if(handle == INVALID_HANDLE)
     {
      PrintFormat("FundAgentStatus: cannot open %s (error %d)", tmp, GetLastError());
      return false;
     }
   uint written = FileWriteArray(handle, bytes, 0, count);
   FileClose(handle);
   if((int)written != count)
     {
      PrintFormat("FundAgentStatus: short write to %s (%u of %d bytes)", tmp, written, count);
      return false;
     }
   if(!FileMove(tmp, FILE_COMMON, name, FILE_COMMON | FILE_REWRITE))
     {
      PrintFormat("FundAgentStatus: cannot move %s over %s (error %d)", tmp, name, GetLastError());
      return false;
     }
   return true;
  }

//+------------------------------------------------------------------+
//| Optional POST to the agent's loopback intake. The URL must be in |
//| Tools > Options > Expert Advisors > "Allow WebRequest for".      |
//+------------------------------------------------------------------+
void PostStatus(const string json)
  {
   if(InpPostUrl == "")
      return;
   uchar body[];
   int count = StringToCharArray(json, body, 0, WHOLE_ARRAY, CP_UTF8) - 1;
   if(count <= 0)
      return;
   ArrayResize(body, count);
   string headers = "Content-Type: application/json\r\nX-Fund-Agent-Secret: " + InpSecret + "\r\n";
   uchar  result[];
   string result_headers;
   ResetLastError();
   int status = WebRequest("POST", InpPostUrl, headers, 3000, body, result, result_headers);
   if(status != 200)
      PrintFormat("FundAgentStatus: POST to %s answered %d (error %d)", InpPostUrl, status, GetLastError());
  }

void Report(const bool connected)
  {
   string json = StatusJson(connected);
   WriteStatus(json);
   PostStatus(json);
  }

int OnInit()
  {
   if(InpIntervalSeconds < 1)
     {
      Print("FundAgentStatus: InpIntervalSeconds must be at least 1");
      return INIT_PARAMETERS_INCORRECT;
     }
   if(!FolderCreate(InpFolder, FILE_COMMON))
      PrintFormat("FundAgentStatus: cannot create Common\\Files\\%s (error %d)", InpFolder, GetLastError());
   if(!EventSetTimer(InpIntervalSeconds))
     {
      PrintFormat("FundAgentStatus: EventSetTimer failed (error %d)", GetLastError());
      return INIT_FAILED;
     }
   Report(TerminalInfoInteger(TERMINAL_CONNECTED) != 0);
   return INIT_SUCCEEDED;
  }

void OnTimer()
  {
   Report(TerminalInfoInteger(TERMINAL_CONNECTED) != 0);
  }

void OnDeinit(const int reason)
  {
   EventKillTimer();
   // A last word: the agent must stop trusting the previous reading at once.
   Report(false);
  }
//+------------------------------------------------------------------+
